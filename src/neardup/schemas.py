"""JSON Schemas of neardup's machine-readable outputs (`query --json`, `dups --json`).

Scores are cosine similarities of unit vectors, in [-1, 1]; 1.0 means identical model input.
"""

_SCORE = {"type": "number", "minimum": -1.0001, "maximum": 1.0001}
_THRESHOLD = {"type": ["number", "null"]}

QUERY = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "neardup query --json",
    "type": "object",
    "required": ["threshold", "results"],
    "additionalProperties": False,
    "properties": {
        "threshold": _THRESHOLD,
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["query", "matches"],
                "additionalProperties": False,
                "properties": {
                    "query": {"type": "string", "description": "the query image path as given"},
                    "matches": {
                        "type": "array",
                        "description": "sorted by score, highest first",
                        "items": {
                            "type": "object",
                            "required": ["path", "score"],
                            "additionalProperties": False,
                            "properties": {"path": {"type": "string", "description": "absolute path"}, "score": _SCORE},
                        },
                    },
                },
            },
        },
    },
}

DUPS = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "neardup dups --json",
    "type": "object",
    "required": ["threshold", "groups"],
    "additionalProperties": False,
    "properties": {
        "threshold": _THRESHOLD,
        "groups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["files", "min_score", "max_score"],
                "additionalProperties": False,
                "properties": {
                    "files": {"type": "array", "minItems": 2, "items": {"type": "string", "description": "absolute path"}},
                    "min_score": {**_SCORE, "description": "weakest verified link joining the group"},
                    "max_score": {**_SCORE, "description": "strongest verified link in the group"},
                },
            },
        },
    },
}
