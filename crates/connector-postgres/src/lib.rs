//! PostgreSQL connector.
