"""A small module to try rwkv.nvim on: enter insert mode on an empty line and type.

<Tab> accepts the suggestion, <S-Tab> one line of it, <M-]> / <M-[> cycle the
candidates shown in the floating window, <C-]> dismisses.
"""
import os
from dataclasses import dataclass


@dataclass
class Item:
    name: str
    size: int


def list_items(path):
    """Return the files under path as Items, largest first."""
    items = []
    for entry in os.scandir(path):
        if entry.is_file():
            items.append(Item(entry.name, entry.stat().st_size))
    items.sort(key=lambda item: item.size, reverse=True)
    return items


def total_size(items):
    total = 0
    for item in items:
        total += item.size
    return total


def main():
    items = list_items(".")
    for item in items[:10]:
        print(f"{item.size:>10} {item.name}")
    print("total", total_size(items))


if __name__ == "__main__":
    main()
