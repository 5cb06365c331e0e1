"""Rich captions (UALM-Reason): Keywords / Layout / Description, rendered and parsed by one formatter.

The layout, one field per line block::

    Keywords: dog, bark, large hall
    Layout: 0-2 s a dog barks twice; 2-5 s its echo fades
    Description: A medium-sized dog barks twice in a large, reverberant hall...

The SFT data and the reasoning modes (inference/reasoning.py) both go through :meth:`RichCaption.render`, so
what the model is trained to write is what the pipelines ask for and read back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FIELDS = ("Keywords", "Layout", "Description")
_FIELD = re.compile(r"^\s*(Keywords|Layout|Description)\s*:\s*", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class RichCaption:
    keywords: tuple[str, ...]
    layout: str
    description: str

    def render(self) -> str:
        return (f"Keywords: {', '.join(self.keywords)}\nLayout: {self.layout.strip()}\n"
                f"Description: {self.description.strip()}")

    @classmethod
    def parse(cls, text: str) -> "RichCaption | None":
        """The fields of a rendered caption (in any order, case-insensitive); None when none is present.

        A model's output may lack a field: it is then empty; text before the first field is ignored.
        """
        marks = list(_FIELD.finditer(text))
        if not marks:
            return None
        values = {name: "" for name in FIELDS}
        for mark, following in zip(marks, marks[1:] + [None]):
            end = following.start() if following is not None else len(text)
            values[mark.group(1).capitalize()] = text[mark.end(): end].strip()
        keywords = tuple(k.strip() for k in values["Keywords"].split(",") if k.strip())
        return cls(keywords, values["Layout"], values["Description"])

    def as_caption(self) -> str:
        """The text a plain text-to-audio prompt uses: the description, else keywords."""
        return self.description or ", ".join(self.keywords) or self.layout
