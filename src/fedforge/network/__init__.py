"""Deployment over the network: the wire format, the server's hub, the client, authentication and TLS, the dashboard."""
