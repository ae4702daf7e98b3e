//! [`Document`]: the unit every connector produces, and [`Change`]: an upsert or a delete.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One item from a source: an issue, a file, a table row, a message, a FHIR resource.
///
/// `id` is stable and unique within (tenant, connector): syncing the same source item again
/// yields the same id, so the store updates it in place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// Stable id, unique within (tenant, connector), e.g. `documents:42`.
    pub id: String,
    /// What the item is: `issue`, `pull_request`, `file`, `row`, `message`, `Patient`, ...
    pub kind: String,
    /// A human title.
    pub title: String,
    /// The searchable text content.
    pub content: String,
    /// Where a person can open the item, if it has an address.
    pub url: Option<String>,
    /// Who wrote or owns it, if known.
    pub author: Option<String>,
    /// When the item was created at the source.
    pub created_at: Option<DateTime<Utc>>,
    /// When the item last changed at the source.
    pub updated_at: Option<DateTime<Utc>>,
    /// Source-specific structured data (columns, labels, object metadata).
    pub metadata: serde_json::Value,
}

impl Document {
    /// A document with the required fields; the rest empty.
    pub fn new(
        id: impl Into<String>,
        kind: impl Into<String>,
        title: impl Into<String>,
        content: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            kind: kind.into(),
            title: title.into(),
            content: content.into(),
            url: None,
            author: None,
            created_at: None,
            updated_at: None,
            metadata: serde_json::Value::Null,
        }
    }

    /// A SHA-256 over every field, hex encoded. Two documents with the same hash are the same
    /// document; the store skips writes whose hash it already holds.
    pub fn content_hash(&self) -> String {
        self.content_hash_with(&serde_json::to_vec(&self.metadata).unwrap_or_default())
    }

    /// [`content_hash`](Self::content_hash) given the metadata already serialized with
    /// `serde_json::to_vec`/`to_string` (stores serialize it anyway to write it).
    pub fn content_hash_with(&self, metadata_json: &[u8]) -> String {
        let mut h = Sha256::new();
        // Length-prefix each field so that field boundaries cannot shift between documents.
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(self.id.as_bytes());
        field(self.kind.as_bytes());
        field(self.title.as_bytes());
        field(self.content.as_bytes());
        field(self.url.as_deref().unwrap_or("\u{0}").as_bytes());
        field(self.author.as_deref().unwrap_or("\u{0}").as_bytes());
        field(&self.created_at.map(|t| t.timestamp_micros()).unwrap_or(i64::MIN).to_le_bytes());
        field(&self.updated_at.map(|t| t.timestamp_micros()).unwrap_or(i64::MIN).to_le_bytes());
        field(metadata_json);
        hex::encode(h.finalize())
    }

    /// Approximate size in bytes, used to bound batch memory.
    pub fn approx_size(&self) -> usize {
        self.id.len()
            + self.kind.len()
            + self.title.len()
            + self.content.len()
            + self.url.as_ref().map_or(0, String::len)
            + self.author.as_ref().map_or(0, String::len)
            + 64
            + match &self.metadata {
                serde_json::Value::Null => 0,
                // Metadata is usually small; serialising it just to size it would be waste.
                serde_json::Value::Object(m) => m.len() * 48,
                _ => 64,
            }
    }
}

/// A change a connector reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Create or replace the document with this id.
    Upsert(Document),
    /// Remove the document with this id.
    Delete {
        /// The id of the document to remove.
        id: String,
    },
}

impl Change {
    /// The id of the document the change applies to.
    pub fn id(&self) -> &str {
        match self {
            Change::Upsert(d) => &d.id,
            Change::Delete { id } => id,
        }
    }
}

/// A source item that could not be turned into a document (a corrupt file, a row that fails
/// to decode). It is counted in `items_failed` and does not fail the sync.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemFailure {
    /// The id the document would have had.
    pub id: String,
    /// What went wrong.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_changes_with_any_field_and_not_otherwise() {
        let d = Document::new("a", "row", "t", "c");
        let base = d.content_hash();
        assert_eq!(base, d.clone().content_hash());
        let mut e = d.clone();
        e.content.push('x');
        assert_ne!(base, e.content_hash());
        let mut e = d.clone();
        e.metadata = serde_json::json!({"k": 1});
        assert_ne!(base, e.content_hash());
        let mut e = d.clone();
        e.url = Some(String::new());
        assert_ne!(base, e.content_hash(), "None and empty url differ");
        // Shifting text between fields changes the hash.
        let a = Document::new("a", "row", "ab", "c");
        let b = Document::new("a", "row", "a", "bc");
        assert_ne!(a.content_hash(), b.content_hash());
    }
}
