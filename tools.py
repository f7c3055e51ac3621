"""Tools the agent can call: their schemas (shown to the model in the system prompt).

The tool names and arguments are fixed by DESIGN.md: `crop`, `image_search`, `text_search`, `visit`.
"""

# The JSON-schema of each tool's arguments, listed in the system prompt exactly as written here.
TOOL_SCHEMAS = [
    {
        "name": "crop",
        "description": "Zoom into a region of an image. `image` is 0 for the question image, then "
                       "1, 2, ... for every image received since, in order.",
        "parameters": {"type": "object", "properties": {
            "image": {"type": "integer", "default": 0},
            "bbox": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}},
            "required": ["bbox"]},
    },
    {
        "name": "image_search",
        "description": "Reverse image search on an image, or on a region of it when `bbox` is given.",
        "parameters": {"type": "object", "properties": {
            "image": {"type": "integer", "default": 0},
            "bbox": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}},
            "required": []},
    },
    {
        "name": "text_search",
        "description": "Web search for a text query; returns the top results (title, url, snippet).",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]},
    },
    {
        "name": "visit",
        "description": "Read a web page; returns the parts most relevant to `goal`.",
        "parameters": {"type": "object", "properties": {
            "url": {"type": "string"}, "goal": {"type": "string"}},
            "required": ["url", "goal"]},
    },
]
