"""The scheduler core: schedules, solver plans, the sync-free loop and the functional API."""
