// The type bytes of protocol v3 messages, per direction
// (https://www.postgresql.org/docs/15/protocol-message-formats.html).
#pragma once

namespace pgwarden::wire {

// Sent by the client (frontend).
namespace fe {
inline constexpr char kBind = 'B';
inline constexpr char kClose = 'C';
inline constexpr char kCopyData = 'd';
inline constexpr char kCopyDone = 'c';
inline constexpr char kCopyFail = 'f';
inline constexpr char kDescribe = 'D';
inline constexpr char kExecute = 'E';
inline constexpr char kFlush = 'H';
inline constexpr char kFunctionCall = 'F';
inline constexpr char kParse = 'P';
inline constexpr char kPassword = 'p';  // also SASLInitialResponse, SASLResponse, GSSResponse
inline constexpr char kQuery = 'Q';
inline constexpr char kSync = 'S';
inline constexpr char kTerminate = 'X';
}  // namespace fe

// Sent by the server (backend).
namespace be {
inline constexpr char kAuthentication = 'R';
inline constexpr char kBackendKeyData = 'K';
inline constexpr char kBindComplete = '2';
inline constexpr char kCloseComplete = '3';
inline constexpr char kCommandComplete = 'C';
inline constexpr char kCopyBothResponse = 'W';
inline constexpr char kCopyData = 'd';
inline constexpr char kCopyDone = 'c';
inline constexpr char kCopyInResponse = 'G';
inline constexpr char kCopyOutResponse = 'H';
inline constexpr char kDataRow = 'D';
inline constexpr char kEmptyQueryResponse = 'I';
inline constexpr char kErrorResponse = 'E';
inline constexpr char kFunctionCallResponse = 'V';
inline constexpr char kNegotiateProtocolVersion = 'v';
inline constexpr char kNoData = 'n';
inline constexpr char kNoticeResponse = 'N';
inline constexpr char kNotificationResponse = 'A';
inline constexpr char kParameterDescription = 't';
inline constexpr char kParameterStatus = 'S';
inline constexpr char kParseComplete = '1';
inline constexpr char kPortalSuspended = 's';
inline constexpr char kReadyForQuery = 'Z';
inline constexpr char kRowDescription = 'T';
}  // namespace be

// Authentication request codes (the int32 after 'R').
namespace auth {
inline constexpr int kOk = 0;
inline constexpr int kKerberosV5 = 2;
inline constexpr int kCleartextPassword = 3;
inline constexpr int kMd5Password = 5;
inline constexpr int kGss = 7;
inline constexpr int kGssContinue = 8;
inline constexpr int kSspi = 9;
inline constexpr int kSasl = 10;
inline constexpr int kSaslContinue = 11;
inline constexpr int kSaslFinal = 12;
}  // namespace auth

// Is this a type byte the frontend may send after startup?
bool is_frontend_type(char type);
// Is this a type byte the backend may send?
bool is_backend_type(char type);

}  // namespace pgwarden::wire
