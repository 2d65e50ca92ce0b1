"""Pulumi ComponentResources of the MAXIMUS platform, one module per component."""
