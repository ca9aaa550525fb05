"""Adapters that ship with snakepit: the showcase the demo and the tests rely on."""
