"""A small stand-in for the HITL patch service: FastAPI on uvicorn over PostgreSQL and Redis.

Run with `python -m workload --host 127.0.0.1 --port N`; configured only by MAXIMUS_* variables.
"""
