"""wicket node agent: opens, enforces and closes WireGuard lanes on a site's edge router."""

__version__ = "0.1.0"
