"""The VMix tab: make an adapter from the checkpoint the WebUI has loaded (objective "distill").

The same run as ``python -m vmix_lib.train --objective distill`` (vmix_lib.train.session.train_on_model,
the same DistillTraining objective, the same files and resume state); only the host differs:

    request.py   the tab's and the API's settings -> a TrainConfig, checked (one sentence per mistake); pure
    job.py       one job at a time: runs the session on a WebUIModel, reports progress, stops after a step
                 when interrupted, and puts the WebUI back as it was whatever happens; pure
    models.py    the loaded checkpoint as the session's ModelParts, in AUTOMATIC1111 and in Forge / Forge Neo
                 (forward, conditioning, "[CLS]" vectors, ᾱ, VAE decode), and everything it must undo
    tab.py       the gradio tab (on_ui_tabs);   api.py  the /vmix/v1/... routes (on_app_started)

Only models.py, tab.py and api.py import the WebUI, inside functions.
"""
