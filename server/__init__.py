"""Serving layer: engine, HTTP API, settings and the command line."""
