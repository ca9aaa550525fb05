"""The router: session-affinity scheduling of tool calls over a pool of workers."""
