"""handoff as an A2A server: agent cards from the registry, chains as A2A tasks."""
