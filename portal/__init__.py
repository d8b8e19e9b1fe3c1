"""Server-rendered portal pages (Jinja); no business logic lives here."""
