//! Memory meters: where a probe's bytes come from. Placeholder until the meters land.
