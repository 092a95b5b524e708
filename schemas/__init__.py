"""Avro schemas of every record conveyor puts on a log (installed as ``conveyor.schemas``)."""
