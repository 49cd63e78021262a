"""The Gradio app (``studio.ui``), installed with the ``[ui]`` extra; arrives with its issue."""
