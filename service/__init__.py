"""The streaming generation service (serve.py): jobs, the HTTP/WebSocket app and the web page."""
