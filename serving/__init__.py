"""Ray Serve deployments, the gRPC gateway, configuration and the command line."""
