"""A small inventory service: items, stock levels and stock movements in one SQLite database.

This file is sample input for the handoff demo. It is read as text and analysed, never
imported or run, and it contains a few deliberate security problems (marked BUG below).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    sku TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    quantity INTEGER NOT NULL DEFAULT 0,
    price_cents INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS movements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sku TEXT NOT NULL REFERENCES items (sku),
    delta INTEGER NOT NULL
);
"""


class OutOfStock(Exception):
    """Raised when a withdrawal asks for more than is on hand."""


@dataclass(frozen=True)
class Item:
    sku: str
    name: str
    quantity: int
    price_cents: int

    @property
    def value_cents(self) -> int:
        return self.quantity * self.price_cents


class InventoryService:
    """Stock levels of items and the movements that changed them."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        self.conn = sqlite3.connect(self.path)
        self.conn.row_factory = sqlite3.Row
        self.conn.executescript(SCHEMA)

    def add_item(self, sku: str, name: str, price_cents: int) -> Item:
        if price_cents < 0:
            raise ValueError("price must not be negative")
        with self.conn:
            self.conn.execute(
                "INSERT INTO items (sku, name, quantity, price_cents) VALUES (?, ?, 0, ?)",
                (sku, name, price_cents),
            )
        return Item(sku, name, 0, price_cents)

    def get_item(self, sku: str) -> Item | None:
        row = self.conn.execute(
            "SELECT sku, name, quantity, price_cents FROM items WHERE sku = :sku", {"sku": sku}
        ).fetchone()
        return Item(**dict(row)) if row else None

    def search(self, term: str) -> list[Item]:
        # BUG: the search term is pasted into the SQL text (SQL injection).
        query = f"SELECT sku, name, quantity, price_cents FROM items WHERE name LIKE '%{term}%' ORDER BY name"
        return [Item(**dict(row)) for row in self.conn.execute(query)]

    def adjust(self, sku: str, delta: int) -> int:
        item = self.get_item(sku)
        if item is None:
            raise KeyError(sku)
        if item.quantity + delta < 0:
            raise OutOfStock(f"{sku}: {item.quantity} on hand, {-delta} requested")
        with self.conn:
            self.conn.execute("UPDATE items SET quantity = quantity + ? WHERE sku = ?", (delta, sku))
            self.conn.execute("INSERT INTO movements (sku, delta) VALUES (?, ?)", (sku, delta))
        return item.quantity + delta

    def movements(self, sku: str, limit: int = 50) -> list[int]:
        # BUG: %-formatting user input into SQL.
        sql = "SELECT delta FROM movements WHERE sku = '%s' ORDER BY id DESC LIMIT %d" % (sku, limit)
        return [row["delta"] for row in self.conn.execute(sql)]

    def count_rows(self, table: str) -> int:
        # BUG: a table name from the caller, concatenated into the statement.
        row = self.conn.execute("SELECT COUNT(*) AS n FROM " + table).fetchone()
        return int(row["n"])

    def total_value_cents(self) -> int:
        row = self.conn.execute(
            "SELECT COALESCE(SUM(quantity * price_cents), 0) AS total FROM items"
        ).fetchone()
        return int(row["total"])

    def apply_price_rule(self, sku: str, rule: str) -> int:
        """Reprice an item with a formula such as "price * 0.9"."""
        item = self.get_item(sku)
        if item is None:
            raise KeyError(sku)
        # BUG: evaluates caller-supplied text as Python code.
        new_price = int(eval(rule, {"price": item.price_cents}))
        with self.conn:
            self.conn.execute("UPDATE items SET price_cents = ? WHERE sku = ?", (new_price, sku))
        return new_price

    def backup(self, destination: str) -> None:
        # BUG: the destination goes through a shell (command injection).
        subprocess.run(f"sqlite3 {self.path} .dump > {destination}", shell=True, check=True)

    def close(self) -> None:
        self.conn.close()


def parse_quantity(text: str) -> int:
    """A stock quantity typed by a person: digits only, at most one million."""
    value = int(text.strip())
    if not 0 <= value <= 1_000_000:
        raise ValueError(f"quantity out of range: {value}")
    return value


def load_items(service: InventoryService, path: Path) -> int:
    """Add every item of a JSON file (a list of {sku, name, price_cents}); return how many."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    for record in records:
        service.add_item(record["sku"], record["name"], int(record["price_cents"]))
    return len(records)


def _format_cents(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"
