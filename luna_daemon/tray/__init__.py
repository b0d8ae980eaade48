"""The system-tray face of Luna Daemon.

``app`` (TrayApp + ``main``), ``actions`` (what the menu items do), ``health`` (one probe
thread per instance, the ping), ``platform`` (pystray / GTK / OS glue), ``menu`` (pure
view model), ``icons`` (the Luna mark), ``notify`` (rate-limited notifications),
``autostart`` (Start at Login), ``bench`` (launch → green benchmark), ``xsession`` (a
virtual X session with a real tray, for tests and the benchmark). Nothing here imports
pystray at import time: pystray picks a backend and connects to the display when
imported, so only ``app.main`` does that (through ``platform.import_pystray``).
"""
