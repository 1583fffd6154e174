"""Deploying DP-FedEmb on real devices with Flower: credentials and processes."""
