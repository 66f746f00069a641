//! Weekly maintenance windows evaluated in their IANA time zone (jiff's bundled tzdb).
