"""Run fedgan on Flower's Deployment Engine: credentials and a loopback launcher."""
