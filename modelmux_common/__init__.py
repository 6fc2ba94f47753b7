"""Pieces shared by the modelmux daemons: config, logging, gRPC helpers and the CLI."""
