"""One module per tab of the dashboard: its handlers (plain functions the tests call) and a ``build(settings)``
that makes its Gradio block and returns the events that may train the public warm start.

* :mod:`.finetune`: one run of any method, live loss and ε, cancel, time limit, settings as JSON.
* :mod:`.tokens`: the visual tokens a strategy keeps for a test image or an upload.
* :mod:`.memory`: peak memory and step time of the methods side by side.
* :mod:`.sweep`: a small privacy–utility sweep, or a sweep CSV loaded and drawn.
"""
