"""The null backend: a Vast Serverless worker that reserves capacity and runs nothing."""
