"""The servers handoff runs beside the agents: the embedded Temporal server, the codec server
for the Web UI, the local language model, and what every HTTP server of handoff checks."""
