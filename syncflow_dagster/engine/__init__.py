"""The sync engine: pure, columnar functions frame → frame.

Imports nothing from dagster, httpx or sqlalchemy, and is testable with no
database and no server.
"""
