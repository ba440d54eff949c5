"""The client-server contract: what a reply carries and how the server decodes it."""
