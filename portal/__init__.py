"""Server-rendered portal pages (Jinja); no business logic lives here.

Views call ``accounts.services`` and render what comes back; typed errors from the services
become form errors or friendly pages, never 500s. ``portal.views`` assembles the blueprint.
"""
