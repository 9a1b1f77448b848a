"""Small helpers with no dependency of ours, shared by every room (flows, tasks, model)."""
