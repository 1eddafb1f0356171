//! Tests of the job layer, named after the behaviour ids of docs/orchestration.md ("Jobs").
