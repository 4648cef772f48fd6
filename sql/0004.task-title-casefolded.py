"""The projection row carries its title case-folded (`title_casefolded`), for `q`.

`q` used to compare `lower(title)` with `lower(q)`, which follows the database's locale: in
a C-locale database (the embedded server's, where LANG is unset) lower() changes only ASCII
letters, so `q=ärger` missed "Ärger", and no locale folds "STRASSE" to match "Straße".
Python's `str.casefold` (Unicode's full case folding) now makes both sides. Rows that exist
already get theirs here, in the migration's transaction.
"""

from typing import Any

from yoyo import step

__depends__ = {"0003.task-body"}


def add_casefolded_titles(conn: Any) -> None:
    conn.execute("ALTER TABLE tasks ADD COLUMN title_casefolded text")
    conn.execute(
        "CREATE TEMPORARY TABLE casefolded (user_id text, task_id uuid, title text) ON COMMIT DROP"
    )
    with conn.cursor(name="task_titles") as rows, conn.cursor() as cur:
        rows.execute("SELECT user_id, task_id, title FROM tasks")
        while batch := rows.fetchmany(10_000):  # no FETCH while a COPY is open: in turns
            with cur.copy("COPY casefolded FROM STDIN") as copy:
                for user_id, task_id, title in batch:
                    copy.write_row((user_id, task_id, title.casefold()))
    conn.execute(
        "UPDATE tasks SET title_casefolded = c.title FROM casefolded c"
        " WHERE tasks.user_id = c.user_id AND tasks.task_id = c.task_id"
    )
    conn.execute("ALTER TABLE tasks ALTER COLUMN title_casefolded SET NOT NULL")


steps = [step(add_casefolded_titles, "ALTER TABLE tasks DROP COLUMN title_casefolded")]
