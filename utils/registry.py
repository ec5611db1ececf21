"""One shape for every registry of this toolkit (models, datasets, triggers, defenses, attacks): a dict from name to
entry that refuses a name registered twice and answers an unknown name with one error line listing the known ones."""
from utils.errors import UserError


class Registry(dict):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind  # "model", "dataset", ...: the word the error message uses

    def add(self, name, entry):
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self[name] = entry
        return entry

    def lookup(self, name):
        if name not in self:
            raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}")
        return self[name]
