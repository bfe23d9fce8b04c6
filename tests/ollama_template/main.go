// Renders an Ollama Modelfile TEMPLATE the way Ollama's chat does (its template package's
// Execute for a template that uses .Messages): Go's text/template with missingkey=zero and a
// "json" function; .System is every system message joined by blank lines, .Messages every
// message (system ones too), with consecutive messages of one role merged, .Response empty.
// Standard library only, so `go run` needs no network.
//
//	echo '{"template": "...", "messages": [{"role": "user", "content": "Hi"}]}' | go run main.go
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template:", err)
		os.Exit(1)
	}
	var system []string
	var messages []*Message
	for i := range in.Messages {
		m := &in.Messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(messages); n > 0 && messages[n-1].Role == m.Role {
			messages[n-1].Content += "\n\n" + m.Content
		} else {
			messages = append(messages, m)
		}
	}
	data := map[string]any{
		"System":   strings.Join(system, "\n\n"),
		"Messages": messages,
		"Tools":    nil,
		"Response": "",
		"Think":    false,
	}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fmt.Fprintln(os.Stderr, "execute:", err)
		os.Exit(1)
	}
}
