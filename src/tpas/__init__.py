"""tpas: Text-based Person Anomaly Search.

Find a pedestrian image in a large gallery from a text description of the person *and* of what
they are doing, telling normal behaviour from anomalous behaviour of the same-looking person.
"""

__version__ = "0.1.0"
