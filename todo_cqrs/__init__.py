"""todo-cqrs: a multi-user task service whose commands append events to PostgreSQL."""

__version__ = "0.1.0"
