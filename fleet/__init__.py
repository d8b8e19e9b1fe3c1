"""Products, devices, credentials, activation, broker access control and presence."""
