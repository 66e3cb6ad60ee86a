"""The schema revision this build's code needs, known without Alembic.

``tests/integration/test_migrations.py`` checks it against the migrations' own head, so a new
migration that forgets to move it fails the tests. ``/readyz`` waits for it, and a node
whose database is at it already starts without importing Alembic or SQLAlchemy: they
were two fifths of a worker's start and nine tenths of a supervisor's imports.
"""

SCHEMA_HEAD = "0006"
