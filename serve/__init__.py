"""Using a trained model: loading it for inference (``loading``: the one LoadedModel), export glue
(``export``), evaluation (``evaluate``), and the OpenAI-compatible HTTP app with its web chat page (``app``).
Imports train/ and model/; train/ never imports serve/."""
