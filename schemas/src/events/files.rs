//! XEP-0363 (HTTP upload): managed file transfers, with the fields of the
//! file-transfer log (SPEC §9).
//!
//! The log's "method (upload/download)" column is the event type; the
//! `method` field here is the transfer mechanism.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::address::BareJid;
use crate::macros::string_enum;

string_enum! {
    /// The transfer mechanism.
    pub enum TransferMethod {
        /// Managed: HTTP upload (XEP-0363) and HTTP download.
        HttpUpload = "http_upload",
        /// Peer to peer over SOCKS5 bytestreams (XEP-0065), proxied.
        Socks5 = "socks5",
    }
}

string_enum! {
    /// Why a transfer failed.
    pub enum TransferFailureReason {
        /// Larger than the maximum file size.
        TooLarge = "too_large",
        /// The file store is full (free-space alarm).
        DiskFull = "disk_full",
        /// Reading or writing the blob or its log record failed.
        IoError = "io_error",
        /// The file does not exist (any more).
        NotFound = "not_found",
        /// The requester may not access the file.
        Forbidden = "forbidden",
        /// The client went away or cancelled.
        Cancelled = "cancelled",
        /// The transfer stalled.
        Timeout = "timeout",
    }
}

/// Declares a transfer event: `transfer_id`, the given fields, then the
/// fields every transfer event shares.
macro_rules! transfer_event {
    (
        $(#[doc = $doc:literal])+
        $name:ident {
            $( $(#[$fmeta:meta])+ $field:ident: $ty:ty, )*
        }
    ) => {
        $(#[doc = $doc])+
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
        pub struct $name {
            /// The transfer id (UUIDv7); every download has its own.
            pub transfer_id: Uuid,
            $( $(#[$fmeta])+ pub $field: $ty, )*
            /// Where the file was shared: a user's bare JID or a room address.
            pub to: String,
            /// The name the file is stored under.
            pub stored_name: String,
            /// The file name the uploader gave.
            pub real_name: String,
            /// The storage path, `files/{im|groupchat|persistent}/YYYYMMDD/HH[.n]/`.
            pub path: String,
            /// The file size in bytes.
            pub size: u64,
            /// The transfer mechanism.
            pub method: TransferMethod,
        }
    };
}

transfer_event! {
    /// An upload started: a slot was granted and the body is arriving.
    FileUploadStarted {
        /// The uploading user.
        uploader: BareJid,
        /// The MIME type the client declared.
        #[serde(default)]
        content_type: Option<String>,
    }
}

transfer_event! {
    /// An upload completed: the blob and its log record are written, so the
    /// file may now be delivered.
    FileUploadCompleted {
        /// The uploading user.
        uploader: BareJid,
        /// Bytes received.
        bytes_transferred: u64,
    }
}

transfer_event! {
    /// An upload failed; the client is told only that it failed, operators
    /// get the reason.
    FileUploadFailed {
        /// The uploading user.
        uploader: BareJid,
        /// Bytes received before the failure.
        bytes_transferred: u64,
        /// Why.
        reason: TransferFailureReason,
        /// Detail for operators.
        #[serde(default)]
        text: Option<String>,
    }
}

transfer_event! {
    /// A download started.
    FileDownloadStarted {
        /// The downloading user.
        downloader: BareJid,
        /// The upload's transfer id.
        upload_id: Uuid,
        /// The user who uploaded the file.
        uploader: BareJid,
    }
}

transfer_event! {
    /// A download completed.
    FileDownloadCompleted {
        /// The downloading user.
        downloader: BareJid,
        /// The upload's transfer id.
        upload_id: Uuid,
        /// The user who uploaded the file.
        uploader: BareJid,
        /// Bytes sent.
        bytes_transferred: u64,
    }
}

transfer_event! {
    /// A download failed.
    FileDownloadFailed {
        /// The downloading user.
        downloader: BareJid,
        /// The upload's transfer id.
        upload_id: Uuid,
        /// The user who uploaded the file.
        uploader: BareJid,
        /// Bytes sent before the failure.
        bytes_transferred: u64,
        /// Why.
        reason: TransferFailureReason,
        /// Detail for operators.
        #[serde(default)]
        text: Option<String>,
    }
}
