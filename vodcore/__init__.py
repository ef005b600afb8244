"""vodcore: what every vodstack tier shares.

config, the object-store interface, playback tokens, the error catalogue, path and Range
parsing, the HTTP cache engine used by edge and shield, metrics, the server runner and the CLI.
"""
