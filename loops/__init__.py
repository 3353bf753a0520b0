"""The viral loops as event-driven state machines, their scheduler and personalisation providers."""
