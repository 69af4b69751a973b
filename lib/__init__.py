"""A local stand-in for Vast Serverless: autoscaler, console API and instances."""
