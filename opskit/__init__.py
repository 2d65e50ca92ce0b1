"""maximus-ops runtime library: the logic behind the Invoke tasks."""
