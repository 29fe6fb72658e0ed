//! vmrig-python
