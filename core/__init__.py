"""What every domain needs: database, errors, Redis, MQTT, queue, tenancy, pagination."""
