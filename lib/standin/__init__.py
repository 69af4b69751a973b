"""A local stand-in for Vast Serverless: autoscaler and console, fleet, scaling model, worker processes."""
