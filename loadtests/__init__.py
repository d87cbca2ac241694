"""Load tests against the gRPC endpoints (Locust users and reports)."""
