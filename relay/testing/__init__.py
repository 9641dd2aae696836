"""Real fake push providers on loopback (TLS via trustme), for tests, the demo and users."""
