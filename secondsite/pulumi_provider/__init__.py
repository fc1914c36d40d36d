"""pulumi_provider."""
